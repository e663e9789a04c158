"""Label keys on the Kubernetes objects Gristmill makes (operator and pod executor agree)."""

NAME = "app.kubernetes.io/name"  # gristmill-worker | gristmill-job
PART_OF = "app.kubernetes.io/part-of"
MANAGED_BY = "app.kubernetes.io/managed-by"
WORKER_GROUP = "gristmill.io/worker-group"
JOB_ID = "gristmill.io/job-id"
WORKER = "gristmill.io/worker"  # on a job pod: the worker pod that runs it
# On a job pod and its Secret: the uid of the worker pod (outside a pod, an id of the worker
# process). Unique per worker, never reused: the selector of the worker's one pod watch.
WORKER_UID = "gristmill.io/worker-uid"
NETWORK = "gristmill.io/network"  # on a job pod: none | allowed
