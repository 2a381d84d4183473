"""Helpers for the tests that look at ci-magic the way a person does: JupyterLab in headless Chromium."""
