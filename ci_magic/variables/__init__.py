"""Notebook variables <-> container files.

``discover`` picks the names a prompt or ``%ci_push`` means, ``codecs`` turns values into files and
files into values, ``fingerprint`` and ``snapshot`` tell unchanged values apart cheaply, ``schema``
writes the card the model reads, ``registry`` remembers what was pushed across containers,
``transfer`` runs push, re-upload, pull and listing on any Backend, and ``progress`` shows large
transfers.
"""
