"""deploy/kubernetes.yaml: a Deployment + Service that parse, probe the server's real endpoints, and start the
server with flags the CLI accepts."""

from __future__ import annotations

from pathlib import Path

import yaml

from rfdetr_serve.cli import GRACEFUL_SHUTDOWN_S, build_parser

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes.yaml"


def test_manifest_is_a_deployment_and_service_probing_healthz_and_readyz():
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service"}
    dep, svc = kinds["Deployment"], kinds["Service"]
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert svc["spec"]["ports"][0]["targetPort"] in port_names
    args = container["args"]
    assert args[0] == "rfdetr-serve"
    parsed = build_parser().parse_args(args[1:])  # the flags exist (argparse exits on unknown ones)
    assert parsed.host == "0.0.0.0" and parsed.port == port_names["http"]
    assert container["livenessProbe"]["httpGet"]["port"] in (*port_names, parsed.port)
    assert pod["spec"]["terminationGracePeriodSeconds"] > GRACEFUL_SHUTDOWN_S  # longer than the server's drain
    env = {e["name"] for e in container.get("env", [])}
    assert "RFDETR_SERVE_API_KEY" in env
