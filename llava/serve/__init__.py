"""Serving: the chat engine (``chat``), the side-by-side web demo (``gradio_demo``) and the
terminal chat (``cli``)."""
