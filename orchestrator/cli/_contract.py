"""`parjobs asyncapi`: the published contract, generated from the topology and the schemas."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
import yaml

from orchestrator import __version__
from orchestrator.broker.asyncapi import JsonObject, asyncapi_document, to_json
from orchestrator.broker.topology import Topology

CHECKED_IN = Path("docs/asyncapi.json")
"""The copy in the repository, relative to its root; the tests hold it equal to `published()`."""
REGENERATE = f"parjobs asyncapi --output {CHECKED_IN}"


class Format(StrEnum):
    JSON = "json"
    YAML = "yaml"


def published() -> JsonObject:
    """The AsyncAPI document of parjobs with the default names (prefix `parjobs`)."""
    return asyncapi_document(Topology(), version=__version__)


def render(document: JsonObject, form: Format) -> str:
    """`document` as JSON (as the checked-in copy) or YAML, keys in the document's order."""
    if form is Format.JSON:
        return to_json(document)
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)


def asyncapi(
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write it to this file instead of printing it.", dir_okay=False
        ),
    ] = None,
    form: Annotated[Format, typer.Option("--format", help="json or yaml.")] = Format.JSON,
) -> None:
    """Print the AsyncAPI 3.0 document of parjobs' messages (docs/asyncapi.json is a copy)."""
    text = render(published(), form)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
