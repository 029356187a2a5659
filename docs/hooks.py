"""MkDocs hook: the API index lists every name ``sdclr_fast`` exports, read from the package itself.

``sdclr_fast`` exports its names lazily (``_EXPORTS``), which a static reader such as griffe cannot
see, so the table is generated here; each row links to the object's entry on its module page, and
a name without one is a broken reference that fails ``mkdocs build --strict``.
"""
import importlib
import inspect

MARKER = "<!-- sdclr_fast exports -->"


def export_table():
    package = importlib.import_module("sdclr_fast")
    rows = ["| name | kind | summary |", "| --- | --- | --- |"]
    for name in package.__all__:
        obj = getattr(package, name)
        path = f"{obj.__module__}.{obj.__qualname__}"
        kind = "class" if inspect.isclass(obj) else "function"
        doc = inspect.getdoc(obj) or ""
        summary = doc.split("\n\n", 1)[0].replace("\n", " ").replace("|", "\\|")
        rows.append(f"| [`{name}`][{path}] | {kind} | {summary} |")
    return "\n".join(rows)


def on_page_markdown(markdown, page, **kwargs):
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, export_table())
    return markdown


def on_config(config, **kwargs):
    # The footer names the version the pages describe (sdclr_fast.__version__).
    config["copyright"] = f"sdclr-fast {importlib.import_module('sdclr_fast').__version__}"
    return config
