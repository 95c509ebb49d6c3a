# lavise dashboard on its embedded default (SynthBirds + demo CNN), served on port 8501.
#   docker build -t lavise . && docker run -p 8501:8501 lavise
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt pyproject.toml ./
RUN python -m venv .venv && .venv/bin/pip install -r requirements.txt
COPY . .
RUN make assets
EXPOSE 8501
CMD ["make", "demo"]
