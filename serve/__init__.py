"""Serving meta-models and their adaptations over HTTP with Ray Serve.

* :mod:`serve.app` — ``build_app(settings)``: the ingress bound in front of the model replicas.
* :mod:`serve.ingress` — the FastAPI ingress deployment: checks, resolves ids once, forwards
  to a model replica that holds the model.
* :mod:`serve.host` — the model replica deployment: multiplexed model cache, batching, adapt.
* :mod:`serve.store` — run folders, model ids and :class:`~serve.store.ModelRef`, loading.
* :mod:`serve.adapted` — content-derived ids and atomic files of adapted models.
* :mod:`serve.signature` — a run's inputs and outputs: request decoding and checks, answers.
* :mod:`serve.batching` — which requests share a forward pass, and how large a pass grows.
* :mod:`serve.errors` — the 4xx error types and how they become HTTP answers.
* :mod:`serve.schemas` — request/response models and :class:`~serve.schemas.ServeSettings`.
* :mod:`serve.auth` — bearer token, body-size gate, where-served headers.
* :mod:`serve.launch` — start Ray + Serve with the chosen ingress (``edgemeta serve``).
* :mod:`serve.client` — :class:`~serve.client.EdgeMetaClient`, a small HTTP client.

Importing this package imports neither Ray nor torch; the submodules do what they need.
"""
