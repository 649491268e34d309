-- Argo CD health of a KubeRay RayJob (ray.io/v1, KubeRay v1.7.0).
-- KubeRay reports two fields that can disagree: jobStatus (the Ray job, from the Ray dashboard) and
-- jobDeploymentStatus (KubeRay's own view of cluster + submitter). Terminal failures win over
-- everything else, because KubeRay stops updating jobStatus once it gives up on a RayJob.
local hs = {}
local st = obj.status
local suspend = obj.spec ~= nil and obj.spec.suspend == true
-- Kueue's RayJob integration (the chart's kueue.queueName): the job waits for admission with spec.suspend true, and
-- Kueue sets it to false once the whole cluster fits the queue's quota, or back to true when it preempts the job.
-- Queued is not stuck: Progressing, with the queue named (Argo CD has no Queued status).
local queue = nil
if obj.metadata ~= nil and obj.metadata.labels ~= nil then
  queue = obj.metadata.labels["kueue.x-k8s.io/queue-name"]
end

local function queued(why)
  hs.status = "Progressing"
  hs.message = "Queued in Kueue LocalQueue " .. queue .. ": " .. why
  return hs
end

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
  if suspend and queue ~= nil then
    return queued("waiting for admission; no RayCluster until Kueue admits the whole job")
  end
  if suspend then
    hs.status = "Suspended"
    hs.message = "RayJob is created suspended: no RayCluster until spec.suspend is false"
    return hs
  end
  hs.status = "Progressing"
  hs.message = "Waiting for the KubeRay operator to pick up the RayJob"
  if st ~= nil and (st.failed or 0) > 0 then
    -- Retrying -> New: KubeRay cleared jobStatus and jobDeploymentStatus and starts the next attempt.
    hs.message = "Waiting for KubeRay to start the next attempt after " .. tostring(st.failed) .. " failed"
  end
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

-- Attempts: the first plus spec.backoffLimit retries. status.failed counts the attempts that failed
-- (KubeRay v1.7.0 rayjob_controller.go, checkBackoffLimitAndUpdateStatusIfNeeded).
local limit = 0
if obj.spec ~= nil and obj.spec.backoffLimit ~= nil then
  limit = obj.spec.backoffLimit
end
local failed = st.failed or 0
local attempts = limit + 1

-- jobDeploymentStatus Failed is terminal even when jobStatus still says RUNNING or PENDING:
-- KubeRay stops polling the dashboard once the submitter fails or activeDeadlineSeconds passes,
-- so jobStatus keeps its last value (ray-project/kuberay#2314). KubeRay decides on a retry in the same
-- reconcile that writes Failed (checkBackoffLimitAndUpdateStatusIfNeeded), so a Failed it persists is final.
if dep == "Failed" then
  local text = "RayJob failed"
  if job ~= "" and job ~= "FAILED" then
    text = text .. " while the Ray job last reported " .. job
  end
  if limit > 0 then
    text = text .. " after " .. tostring(failed) .. " of " .. tostring(attempts) .. " attempts"
  end
  hs.status = "Degraded"
  hs.message = detail(text)
  return hs
end

-- Retrying: the attempt failed and backoffLimit allows another. jobStatus still says FAILED from that
-- attempt while KubeRay deletes the RayCluster and starts over (Retrying -> New -> Initializing).
if dep == "Retrying" then
  hs.status = "Progressing"
  hs.message = detail("Attempt " .. tostring(failed) .. " of " .. tostring(attempts) ..
    " failed; KubeRay is retrying on a new RayCluster (attempt " .. tostring(failed + 1) .. " of " .. tostring(attempts) .. ")")
  return hs
end

if dep == "Complete" then
  if job == "SUCCEEDED" then
    hs.status = "Healthy"
    hs.message = "Ray job SUCCEEDED"
    return hs
  end
  -- Complete is never retried: STOPPED, or the submitter finished with the job status unknown.
  hs.status = "Degraded"
  if job == "STOPPED" then
    hs.message = detail("Ray job was STOPPED before it finished")
  else
    hs.message = detail("RayJob is Complete but the Ray job status is " .. (job ~= "" and job or "unknown"))
  end
  return hs
end

-- The Ray job can fail before KubeRay moves the deployment on (ray-project/kuberay#1233, #3553): in K8sJobMode
-- KubeRay waits for the submitter to finish. It retries unless this was the last attempt backoffLimit allows.
if job == "FAILED" then
  local attempt = failed + 1
  if failed >= limit then
    hs.status = "Degraded"
    hs.message = detail("Ray job FAILED in its last attempt (" .. tostring(attempt) .. " of " .. tostring(attempts) ..
      ", deployment " .. (dep ~= "" and dep or "New") .. ")")
  else
    hs.status = "Progressing"
    hs.message = detail("Ray job FAILED in attempt " .. tostring(attempt) .. " of " .. tostring(attempts) ..
      "; KubeRay will retry it on a new RayCluster")
  end
  return hs
end
if job == "STOPPED" then
  hs.status = "Degraded"
  hs.message = detail("Ray job was STOPPED before it finished")
  return hs
end

if job == "SUCCEEDED" then
  -- KubeRay marks the deployment Complete on its next reconcile; until then the sync is not done.
  hs.status = "Progressing"
  hs.message = "Ray job SUCCEEDED; waiting for KubeRay to mark the deployment Complete (now " .. dep .. ")"
  return hs
end

-- Under Kueue, KubeRay walks a suspended job New -> Initializing -> Suspending -> Suspended without a RayCluster
-- (rayjob_controller.go: updateStatusToSuspendingIfNeeded runs before getOrCreateRayClusterInstance).
if queue ~= nil and (suspend or dep == "Suspending") then
  if dep == "Suspending" and job ~= "" then
    return queued("preempted; KubeRay is deleting its RayCluster, the run resumes from its last checkpoint when admitted again")
  end
  return queued("waiting for admission; no RayCluster until Kueue admits the whole job (deployment " ..
    (dep ~= "" and dep or "New") .. ")")
end
if queue ~= nil and dep == "Suspended" then
  hs.status = "Progressing"
  hs.message = "Admitted by Kueue (LocalQueue " .. queue .. "); KubeRay is starting the RayCluster"
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

local text = "Deployment " .. (dep ~= "" and dep or "New") .. ", Ray job " .. (job ~= "" and job or "not submitted yet")
if limit > 0 or failed > 0 then
  text = text .. " (attempt " .. tostring(failed + 1) .. " of " .. tostring(attempts) .. ")"
end
-- Training progress: rank 0 of the trainer writes a flat JSON object into this annotation (trainer/progress.py);
-- Argo CD's Lua has no JSON library, so read the few numbers with patterns.
if job == "RUNNING" and obj.metadata ~= nil and obj.metadata.annotations ~= nil then
  local raw = obj.metadata.annotations["dolly-train.dev/progress"]
  if type(raw) == "string" then
    local function num(key)
      return tonumber(string.match(raw, '"' .. key .. '"%s*:%s*(%-?[%d%.eE%+%-]+)'))
    end
    local function grouped(n)
      local s = tostring(math.floor(n))
      local out = s:reverse():gsub("(%d%d%d)", "%1,"):reverse()
      return (out:gsub("^,", ""))
    end
    local step, total = num("step"), num("total_steps")
    if step ~= nil then
      local p = "step " .. grouped(step)
      if total ~= nil and total > 0 then
        p = p .. "/" .. grouped(total) .. " (" .. tostring(math.floor(100 * step / total + 0.5)) .. "%)"
      end
      local eta = num("eta_seconds")
      if eta ~= nil then
        if eta < 60 then
          p = p .. ", ETA " .. tostring(math.floor(eta)) .. " s"
        elseif eta < 5400 then
          p = p .. ", ETA " .. tostring(math.floor(eta / 60 + 0.5)) .. " min"
        else
          local m = math.floor(eta / 60 + 0.5)
          p = p .. ", ETA " .. tostring(math.floor(m / 60)) .. " h " .. tostring(m % 60) .. " min"
        end
      end
      local loss = num("loss")
      if loss ~= nil then
        p = p .. ", loss " .. string.format("%.2f", loss)
      end
      text = text .. ": " .. p
    end
  end
end
hs.status = "Progressing"
hs.message = text
return hs
