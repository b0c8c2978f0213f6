"""Fake `modules.sd_hijack`: the embedding database refresh, recorded."""

from types import SimpleNamespace

from modules import shared


def _load_textual_inversion_embeddings(force_reload=False):
    shared.CALLS.append(("embedding_db.load_textual_inversion_embeddings", force_reload))


model_hijack = SimpleNamespace(embedding_db=SimpleNamespace(load_textual_inversion_embeddings=_load_textual_inversion_embeddings))
