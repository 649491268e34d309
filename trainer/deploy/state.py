"""What KubeRay reports about a RayJob (`status`), and what it means for a caller waiting on it.

Shared by `dolly-train status|wait` (trainer/deploy/cli.py) and checked against the Argo CD health check
(manifests/argocd/resource_customizations/ray.io/RayJob/health.lua) by tests/test_health_lua.py.
"""

from __future__ import annotations

from dataclasses import dataclass

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # Kueue's LocalQueue of a job (the chart's kueue.queueName)


@dataclass
class RayJobState:
    """What KubeRay reports about a RayJob, and what it means for a caller waiting on it.

    KubeRay v1.7.0 (ray-operator/controllers/ray/rayjob_controller.go) retries a failed RayJob on a new RayCluster
    while `status.failed` < `spec.backoffLimit` + 1 (checkBackoffLimitAndUpdateStatusIfNeeded): it then writes
    jobDeploymentStatus Retrying with jobStatus still FAILED from the attempt that failed, deletes the cluster and
    starts over (Retrying -> New -> Initializing). So jobStatus FAILED alone is not a verdict; a Failed deployment is.

    Under Kueue (the label kueue.x-k8s.io/queue-name) a RayJob waits for admission with spec.suspend true. KubeRay
    walks it New -> Initializing -> Suspending -> Suspended without creating a cluster (updateStatusToSuspendingIfNeeded
    runs before getOrCreateRayClusterInstance) and leaves it there; Kueue's admission sets suspend false and KubeRay
    starts over (Suspended -> New -> Initializing, a new startTime: activeDeadlineSeconds counts from admission).
    A preemption by Kueue sets suspend true again: Running -> Suspending (the cluster is deleted) -> Suspended.
    """

    name: str
    namespace: str
    job_status: str
    deployment_status: str
    reason: str
    message: str
    cluster: str
    suspend: bool
    failed: int
    start_time: str
    end_time: str
    backoff_limit: int = 0
    succeeded: int = 0
    queue: str = ""  # Kueue LocalQueue (label kueue.x-k8s.io/queue-name); empty when Kueue does not manage it

    @classmethod
    def from_object(cls, obj: dict) -> "RayJobState":
        st, meta, spec = obj.get("status") or {}, obj.get("metadata") or {}, obj.get("spec") or {}
        return cls(
            name=meta.get("name", ""), namespace=meta.get("namespace", ""),
            job_status=st.get("jobStatus") or "", deployment_status=st.get("jobDeploymentStatus") or "",
            reason=st.get("reason") or "", message=st.get("message") or "",
            cluster=st.get("rayClusterName") or "", suspend=bool(spec.get("suspend")),
            failed=int(st.get("failed") or 0), start_time=st.get("startTime") or "", end_time=st.get("endTime") or "",
            backoff_limit=int(spec.get("backoffLimit") or 0), succeeded=int(st.get("succeeded") or 0),
            queue=(meta.get("labels") or {}).get(KUEUE_QUEUE_LABEL) or "",
        )

    @property
    def attempts(self) -> int:
        """Attempts KubeRay makes in all: the first plus spec.backoffLimit retries."""
        return self.backoff_limit + 1

    @property
    def attempt(self) -> int:
        """The attempt now running (1-based); in Retrying and Failed, `failed` already counts the attempt that just
        failed."""
        return self.failed if self.deployment_status in ("Retrying", "Failed") and self.failed else self.failed + 1

    @property
    def queued(self) -> bool:
        """Waiting for Kueue to admit it (first time or after a preemption): nothing of it runs meanwhile."""
        if not self.queue or self.deployment_status in ("Complete", "Failed", "ValidationFailed"):
            return False
        return self.suspend or self.deployment_status == "Suspending"

    @property
    def outcome(self) -> str:
        """'succeeded', 'failed', 'queued' (waiting for Kueue's admission) or 'running'. Mirrors the Argo CD health
        check (manifests/argocd/resource_customizations/ray.io/RayJob/health.lua): failed only when KubeRay says the
        deployment failed, or the Ray job failed in the last attempt that backoffLimit allows; queued where the check
        says "Queued in Kueue LocalQueue ..." (Progressing)."""
        dep, job = self.deployment_status, self.job_status
        if dep in ("Failed", "ValidationFailed"):
            return "failed"  # terminal: KubeRay retries before it writes Failed, never after
        if dep == "Retrying":
            return "running"  # jobStatus is the failed attempt's; a new RayCluster is on its way
        if dep == "Complete":
            return "succeeded" if job == "SUCCEEDED" else "failed"
        if job == "FAILED":
            # The submitter has not finished yet (K8sJobMode waits for it); KubeRay retries unless this was the last.
            return "failed" if self.failed >= self.backoff_limit else "running"
        if job == "STOPPED":
            return "failed"  # KubeRay marks a STOPPED job Complete, and never retries a Complete RayJob
        if self.queued:
            return "queued"
        return "running"  # SUCCEEDED waits for the deployment to be marked Complete on the next reconcile

    def attempt_text(self) -> str:
        if self.deployment_status == "Retrying":
            return (f"attempt {self.attempt}/{self.attempts} failed, retrying on a new RayCluster "
                    f"(attempt {self.attempt + 1}/{self.attempts})")
        if self.deployment_status == "Failed":
            return f"after attempt {self.attempt}/{self.attempts}"
        if self.job_status == "FAILED" and self.deployment_status != "Complete":
            if self.outcome == "running":
                return f"attempt {self.attempt}/{self.attempts} failed, KubeRay will retry"
            return f"attempt {self.attempt}/{self.attempts} failed, no retry left"
        return f"attempt {self.attempt}/{self.attempts}"

    def summary(self) -> str:
        text = f"deployment {self.deployment_status or 'New'}, job {self.job_status or '-'}"
        if self.outcome == "queued":
            why = ("preempted by Kueue, KubeRay is deleting its RayCluster"
                   if self.deployment_status == "Suspending" and self.job_status
                   else "waiting for Kueue to admit the whole RayCluster")
            text = f"queued in Kueue LocalQueue {self.queue} ({why}); {text}"
        elif self.queue and self.deployment_status == "Suspended":
            text = f"admitted by Kueue, KubeRay is starting it; {text}"
        if (self.backoff_limit or self.failed) and self.deployment_status != "ValidationFailed":
            text += f", {self.attempt_text()}"
        if self.suspend and self.outcome != "queued":
            text += ", suspended"
        if self.outcome == "failed" and self.deployment_status == "Failed" and self.job_status not in ("", "FAILED"):
            text += f" (KubeRay gave up while the Ray job last reported {self.job_status})"
        if self.reason:
            text += f" [{self.reason}]"
        if self.message:
            text += f": {self.message}"
        return text
