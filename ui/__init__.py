"""The browser app's adapters and layout: the only package, beside app.py, that imports gradio."""
