"""Async inference jobs: every model's ``POST .../jobs`` and ``GET .../jobs/{id}``, kept in the
data bucket and served by the S3 pipeline's worker.

    keys.py      where a job's objects live, whose they are, its id
    service.py   :class:`Jobs`: create (inline input or presigned upload) and status, from S3 alone
    routes.py    the route table the jobs function serves
    settings.py  the jobs function's variables
"""

from tierserve.jobs.keys import JobKeys, caller_of, new_job_id
from tierserve.jobs.routes import JOB_ROUTES, JOBS_HELP, is_jobs_path
from tierserve.jobs.service import Jobs, Upload, job_url
from tierserve.jobs.settings import JobsSettings

__all__ = [
    "JOBS_HELP",
    "JOB_ROUTES",
    "JobKeys",
    "Jobs",
    "JobsSettings",
    "Upload",
    "caller_of",
    "is_jobs_path",
    "job_url",
    "new_job_id",
]
