"""The jobs routes, a tierserve extension of the Open Inference Protocol, beside each model's
OIP routes (README, "Async jobs")."""

from __future__ import annotations

from tierserve.jobs.service import Jobs
from tierserve.routes import Route

JOB_ROUTES: tuple[Route, ...] = (
    Route("POST", "/v2/models/<model>/jobs", Jobs.create, takes_request=True),
    Route("POST", "/v2/models/<model>/versions/<version>/jobs", Jobs.create, takes_request=True),
    Route("GET", "/v2/models/<model>/jobs/<job_id>", Jobs.status, takes_request=True),
)
JOBS_HELP = "jobs routes: POST /v2/models/{model}[/versions/{v}]/jobs, GET /v2/models/{model}/jobs/{id}"


def is_jobs_path(path: str) -> bool:
    """Whether ``path`` is under a model's jobs routes (what API Gateway sends the jobs function)."""
    parts = path.strip("/").split("/")
    if parts[:2] != ["v2", "models"] or len(parts) < 4:
        return False
    return parts[3] == "jobs" or (len(parts) >= 6 and parts[3] == "versions" and parts[5] == "jobs")
