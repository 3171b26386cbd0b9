"""Label Studio's ML-backend protocol: /health, /setup, /predict, /webhook, /versions.

Each route parses, calls one service function and returns its JSON; Label Studio's wire format
lives in `lookalike.service.protocol`, webhook dispatch in `lookalike.service.events`.
"""

from __future__ import annotations

from flask import Blueprint, jsonify

from lookalike import __version__
from lookalike.service import events
from lookalike.service import protocol as ml_protocol
from lookalike.web.context import json_body, services

blueprint = Blueprint("protocol", __name__)


@blueprint.get("/health")
def health():
    return jsonify(status="UP", model_class="Lookalike", version=__version__)


@blueprint.post("/setup")
def setup():
    return jsonify(ml_protocol.setup(services().similarity, json_body()))


@blueprint.get("/versions")
def versions():
    return jsonify(versions=[services().rt.settings.model_version])


@blueprint.post("/webhook")
def webhook():
    return jsonify(events.handle_webhook(services().rt, json_body()))


@blueprint.post("/predict")
def predict():
    return jsonify(ml_protocol.predict(services().similarity, json_body()))
