"""The NiceGUI passkey approval page.

Arrives with the approval page; nothing is exported yet.
"""
