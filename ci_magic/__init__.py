"""ci-magic: a code interpreter in every notebook (``%load_ext ci_magic``)."""
