"""Serving meta-models and their adaptations over HTTP with Ray Serve.

* :mod:`serve.app` — the Serve deployment (FastAPI ingress) and ``build_app(settings)``.
* :mod:`serve.models` — the model store: ids, run folders, adapted models, batching rules.
* :mod:`serve.schemas` — request/response models and :class:`~serve.schemas.ServeSettings`.
* :mod:`serve.auth` — bearer token, body-size gate, where-served headers.
* :mod:`serve.launch` — start Ray + Serve with the chosen ingress (``edgemeta serve``).
* :mod:`serve.client` — :class:`~serve.client.EdgeMetaClient`, a small HTTP client.

Importing this package imports neither Ray nor torch; the submodules do what they need.
"""
