"""Notebook variables <-> container files.

``formats`` is the one table of file formats (extension -> what it holds, how the container loads
it, how the host decodes it and how big that gets); ``codecs`` has one codec per kind of value
(frames, arrays, JSON-able values, text, bytes, images and figures, paths); ``discover`` picks the
names a prompt or ``%ci_push`` means; ``fingerprint`` and ``snapshot`` tell unchanged values apart
cheaply; ``schema`` writes the card the model reads; ``registry`` remembers what was pushed across
containers; ``transfer`` runs push, re-upload, pull and listing on one container of any Backend;
``progress`` shows large transfers.

A push goes ``PushRequest`` (what the user asked) -> ``Prepared`` (classified, fingerprinted,
encoded) -> ``PushedFile`` (in the registry: what is in the container) -> ``PushOutcome`` (the
report line).
"""
