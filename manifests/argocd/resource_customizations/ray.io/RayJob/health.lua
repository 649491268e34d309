-- Argo CD health of a KubeRay RayJob (ray.io/v1, KubeRay v1.7.0).
-- KubeRay reports two fields that can disagree: jobStatus (the Ray job, from the Ray dashboard) and
-- jobDeploymentStatus (KubeRay's own view of cluster + submitter). Terminal failures win over
-- everything else, because KubeRay stops updating jobStatus once it gives up on a RayJob.
local hs = {}
local st = obj.status
local suspend = obj.spec ~= nil and obj.spec.suspend == true

local function detail(text)
  if st.reason ~= nil and st.reason ~= "" then
    text = text .. " (" .. st.reason .. ")"
  end
  if st.message ~= nil and st.message ~= "" then
    text = text .. ": " .. st.message
  end
  return text
end

if st == nil or ((st.jobDeploymentStatus or "") == "" and (st.jobStatus or "") == "") then
  if suspend then
    hs.status = "Suspended"
    hs.message = "RayJob is created suspended: no RayCluster until spec.suspend is false"
    return hs
  end
  hs.status = "Progressing"
  hs.message = "Waiting for the KubeRay operator to pick up the RayJob"
  return hs
end

local job = st.jobStatus or ""
local dep = st.jobDeploymentStatus or ""

-- The spec was rejected (bad runtimeEnvYAML, name too long, ...): nothing will ever run.
if dep == "ValidationFailed" then
  hs.status = "Degraded"
  hs.message = detail("RayJob failed validation")
  return hs
end

-- jobDeploymentStatus Failed is terminal even when jobStatus still says RUNNING or PENDING:
-- KubeRay stops polling the dashboard once the submitter fails or activeDeadlineSeconds passes,
-- so jobStatus keeps its last value (ray-project/kuberay#2314).
if dep == "Failed" then
  local text = "RayJob failed"
  if job ~= "" and job ~= "FAILED" then
    text = text .. " while the Ray job last reported " .. job
  end
  hs.status = "Degraded"
  hs.message = detail(text)
  return hs
end

-- The Ray job can fail before KubeRay moves the deployment on (ray-project/kuberay#1233, #3553):
-- the job status is the truth about the work.
if job == "FAILED" then
  hs.status = "Degraded"
  hs.message = detail("Ray job FAILED (deployment " .. (dep ~= "" and dep or "New") .. ")")
  return hs
end
if job == "STOPPED" then
  hs.status = "Degraded"
  hs.message = detail("Ray job was STOPPED before it finished")
  return hs
end

if job == "SUCCEEDED" then
  if dep == "Complete" then
    hs.status = "Healthy"
    hs.message = "Ray job SUCCEEDED"
    return hs
  end
  -- KubeRay marks the deployment Complete on its next reconcile; until then the sync is not done.
  hs.status = "Progressing"
  hs.message = "Ray job SUCCEEDED; waiting for KubeRay to mark the deployment Complete (now " .. dep .. ")"
  return hs
end

-- Complete without SUCCEEDED: the submitter finished but the job result is unknown.
if dep == "Complete" then
  hs.status = "Degraded"
  hs.message = detail("RayJob is Complete but the Ray job status is " .. (job ~= "" and job or "unknown"))
  return hs
end

if dep == "Suspended" or dep == "Suspending" or suspend then
  hs.status = "Suspended"
  if dep == "Suspending" then
    hs.message = "RayJob is suspending: KubeRay is deleting its RayCluster"
  else
    hs.message = "RayJob is suspended (spec.suspend is true)"
  end
  return hs
end

if dep == "Retrying" then
  hs.status = "Progressing"
  hs.message = detail("Retrying with a new RayCluster after " .. tostring(st.failed or 0) .. " failed attempt(s)")
  return hs
end

hs.status = "Progressing"
hs.message = "Deployment " .. dep .. ", Ray job " .. (job ~= "" and job or "not submitted yet")
return hs
