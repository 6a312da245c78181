"""Federated feature diffusion on Flower (Message API, Flower ≥ 1.41).

Layout as Flower's app templates: ``task`` (models, data partitions, local training), ``client_app``
(``ClientApp`` with one handler per phase, routed by message type: ``@app.train("encoder")``,
``@app.query("stats")``, …; the types are ``wire.MESSAGE_TYPES``), ``strategy`` (``FedAvg`` sending those
types, optionally wrapped in Flower's client-level DP; the server correction runs outside it, on the
aggregate), ``server_app`` (``ServerApp`` ``@app.main``, whose work is :func:`server_app.run_server`) and
``simulation`` (:func:`simulation.simulate`, the Ray simulation runner behind ``pfdiff fed``). This
``__init__`` imports nothing, so ``import pfdiff.federated`` needs no Flower; the app modules import it.
"""

import logging

# Flower's ``flwr`` logger prints through its own console handler; propagated to a root handler as well (the
# CLI's ``logging.basicConfig``, or the one Opacus installs on import in every Ray worker, ServerApp and
# ClientApp process) each of its lines came twice. Flower's handler alone prints them.
logging.getLogger("flwr").propagate = False
