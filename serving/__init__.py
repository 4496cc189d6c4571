"""Serving a trained model: predictions from a run's released model, after its signed card checks out.

Apart from the coordinator: whoever serves a model needs only the run folder
(the weights, the card, the coordinator's public key), never the coordinator's
keys, ledgers or processes.
"""
