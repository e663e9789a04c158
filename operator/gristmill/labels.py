"""Label keys on the Kubernetes objects Gristmill makes (operator and pod executor agree)."""

NAME = "app.kubernetes.io/name"  # gristmill-worker | gristmill-job
PART_OF = "app.kubernetes.io/part-of"
MANAGED_BY = "app.kubernetes.io/managed-by"
WORKER_GROUP = "gristmill.io/worker-group"
JOB_ID = "gristmill.io/job-id"
WORKER = "gristmill.io/worker"  # on a job pod: the worker pod that runs it
NETWORK = "gristmill.io/network"  # on a job pod: none | allowed
