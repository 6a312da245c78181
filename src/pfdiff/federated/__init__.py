"""Federated feature diffusion on Flower (Message API, Flower ≥ 1.41).

Layout as Flower's app templates: ``task`` (model, data partitions, local train/evaluate),
``client_app`` (``ClientApp`` with ``@app.train`` / ``@app.evaluate``), ``strategy`` (``FedAvg`` with a
server-correction hook), ``server_app`` (``ServerApp`` ``@app.main`` and :func:`run_federated`, a Ray
simulation runner). Modules import ``flwr`` lazily: importing this package needs no Flower.
"""
