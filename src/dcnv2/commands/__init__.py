"""One module per ``dcnv2`` CLI command (see ``dcnv2.cli``)."""
