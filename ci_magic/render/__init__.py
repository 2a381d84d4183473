"""What the user sees: the live view of a turn (``live``), where it goes (``frontend``), file
previews (``files``), small tables (``tables``) and the HTML safety rules (``safe_html``).

Modules are imported where used, so loading the extension does not pay for Pygments or mistune.
"""
