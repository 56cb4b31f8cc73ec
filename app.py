#!/usr/bin/env python3
"""CDK entry point: read and validate context, load the catalog, compose the stacks, synth.

Everything with a decision in it lives in ``infra/``; this file only wires.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "layers" / "tierserve" / "python"))

import aws_cdk as cdk  # noqa: E402

from infra.config import ConfigError, InfraConfig  # noqa: E402
from infra.nag import add_aws_solutions_checks  # noqa: E402
from infra.stacks import build_stacks  # noqa: E402
from tierserve.catalog import Catalog, ManifestError  # noqa: E402


def main(app: cdk.App | None = None) -> cdk.App:
    """Build and synthesize the app; ``app`` lets tests pass context without the CLI."""
    app = app or cdk.App()
    try:
        config = InfraConfig.from_context(app.node.try_get_context)
        catalog_path = config.catalog_path(ROOT)
        if not catalog_path.exists():
            print(
                f"tierserve: no catalog at {catalog_path}: synthesizing the storage stack and an API "
                "with health routes only (no S3 pipeline). Package models (tierserve package) to fill it.",
                file=sys.stderr,
            )
        catalog = Catalog.load(catalog_path)
        build_stacks(app, config=config, catalog=catalog)  # refuses models that cannot be served
    except (ConfigError, ManifestError) as error:
        sys.exit(f"tierserve: {error}")
    add_aws_solutions_checks(app)
    app.synth()
    return app


if __name__ == "__main__":
    main()
