"""The ``alignflow`` subcommands, one module each, registered by ``pipeline_lib/cli.py``: the outermost layer.

Commands may import ``flows`` (the rest of ``pipeline_lib`` never does: tests/unit/test_layout.py checks it); they do
it inside the command's function, so that ``alignflow --help`` and the commands that run no flow start quickly.
"""
