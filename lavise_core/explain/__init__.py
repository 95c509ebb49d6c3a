"""The explanation methods, one package (or module) per family; families do not import each other.

attribution/, dissection/, featurevis/, lavise/, textual/ and the single modules datamap, ood, oramas, siam.
What two families share lives a floor down, in ``lavise_core.data`` or ``lavise_core.models``.
"""
