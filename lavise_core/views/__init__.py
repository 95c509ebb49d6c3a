"""Page-level view functions of the dashboard: pure (no streamlit), one module per page.

Each ``*_view`` function takes the shared :class:`~lavise_core.views.workspace.Workspace` and the widget
values and returns a small dataclass that the page renders. This package re-exports every page's public
names, so a page file needs only ``from lavise_core import views``.
"""

from lavise_core.views.attribution import *  # noqa: F403
from lavise_core.views.build import *  # noqa: F403
from lavise_core.views.classes import *  # noqa: F403
from lavise_core.views.compare import *  # noqa: F403
from lavise_core.views.concepts import *  # noqa: F403
from lavise_core.views.datamap import *  # noqa: F403
from lavise_core.views.dataset import *  # noqa: F403
from lavise_core.views.evaluation import *  # noqa: F403
from lavise_core.views.explain import *  # noqa: F403
from lavise_core.views.export import *  # noqa: F403
from lavise_core.views.featurevis import *  # noqa: F403
from lavise_core.views.filters import *  # noqa: F403
from lavise_core.views.home import *  # noqa: F403
from lavise_core.views.layers import *  # noqa: F403
from lavise_core.views.oramas import *  # noqa: F403
from lavise_core.views.serving import *  # noqa: F403
from lavise_core.views.siam import *  # noqa: F403
from lavise_core.views.trajectory import *  # noqa: F403
from lavise_core.views.workspace import *  # noqa: F403
