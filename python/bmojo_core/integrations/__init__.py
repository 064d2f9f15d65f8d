"""Integrations with other libraries, each imported only when used
(``import bmojo_core.integrations.transformers``)."""
