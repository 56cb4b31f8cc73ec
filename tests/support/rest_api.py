"""Read a synthesized REST API back as routes: resource paths, methods, and which method
API Gateway picks for a request. Shared by the synth tests of the API shell and its routes."""

from __future__ import annotations

import json
from typing import Any

from aws_cdk.assertions import Template


def paths(template: Template) -> dict[str, str]:
    """Resource logical id -> full path, rebuilt from PathPart/ParentId (the root is '')."""
    parts = {k: r["Properties"] for k, r in template.find_resources("AWS::ApiGateway::Resource").items()}

    def path_of(ref: dict[str, Any]) -> str:
        if "Ref" not in ref:
            return ""  # Fn::GetAtt RestApi.RootResourceId
        props = parts[ref["Ref"]]
        return f"{path_of(props['ParentId'])}/{props['PathPart']}"

    return {logical_id: path_of({"Ref": logical_id}) for logical_id in parts}


def methods(template: Template) -> dict[tuple[str, str], dict[str, Any]]:
    """(HTTP method, path) -> the method's properties."""
    by_id = paths(template)
    found = {}
    for method in template.find_resources("AWS::ApiGateway::Method").values():
        props = method["Properties"]
        resource = props["ResourceId"]
        path = by_id[resource["Ref"]] if "Ref" in resource else ""
        found[(props["HttpMethod"], path)] = props
    return found


def route(template: Template, method: str, path: str) -> tuple[str, str]:
    """The (method, resource path) API Gateway picks for a request: static over variable
    segments, a greedy {proxy+} last, ANY when no exact method."""
    table = methods(template)
    resources = {tuple(p.strip("/").split("/")) for _, p in table}

    def score(candidate: tuple[str, ...]) -> tuple[int, ...] | None:
        segments = tuple(path.strip("/").split("/"))
        ranks = []
        for i, part in enumerate(candidate):
            if part == "{proxy+}":
                return (*ranks, 0) if len(segments) > i else None
            if i >= len(segments):
                return None
            if part == segments[i]:
                ranks.append(2)
            elif part.startswith("{"):
                ranks.append(1)
            else:
                return None
        return (*tuple(ranks), 3) if len(candidate) == len(segments) else None

    scored = [(score(c), c) for c in resources]
    best = max((s, c) for s, c in scored if s is not None)[1]
    resource = "/" + "/".join(best)
    return (method if (method, resource) in table else "ANY"), resource


def integration_function(template: Template, props: dict[str, Any]) -> str:
    """The Description of the function a Lambda proxy integration invokes."""
    uri = json.dumps(props["Integration"]["Uri"])
    functions = template.find_resources("AWS::Lambda::Function")
    (description,) = [f["Properties"]["Description"] for k, f in functions.items() if f'"{k}"' in uri]
    return description


def gateway_responses(template: Template) -> dict[str, dict[str, Any]]:
    """ResponseType -> the gateway response's properties."""
    found = template.find_resources("AWS::ApiGateway::GatewayResponse").values()
    return {r["Properties"]["ResponseType"]: r["Properties"] for r in found}


def mock_integrations(template: Template) -> list[dict[str, Any]]:
    """Every MOCK integration of the API."""
    return [p["Integration"] for p in methods(template).values() if p["Integration"]["Type"] == "MOCK"]
