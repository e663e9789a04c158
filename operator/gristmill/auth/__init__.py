"""Who is calling and what they may do: Kubernetes TokenReview and SubjectAccessReview
(or, for `gristmill dev`, one local token), cached briefly as the API server caches them."""
