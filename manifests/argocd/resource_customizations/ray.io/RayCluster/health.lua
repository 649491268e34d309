-- Argo CD health of a KubeRay RayCluster (ray.io/v1, KubeRay v1.7.0).
-- Conditions (RayClusterStatusConditions, on by default since KubeRay 1.3) are the source of truth;
-- status.state alone stays "ready" after the head Pod is gone (ray-project/kuberay#2238) and was
-- "ready" with Pods still Pending before (ray-project/kuberay#2188), so it is only the fallback.
local hs = {}
local st = obj.status
local suspend = obj.spec ~= nil and obj.spec.suspend == true

local function condition(kind)
  if st == nil or st.conditions == nil then
    return nil
  end
  for _, c in ipairs(st.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function said(c, fallback)
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason or fallback
end

if st == nil then
  hs.status = suspend and "Suspended" or "Progressing"
  hs.message = suspend and "RayCluster is created suspended" or "Waiting for the KubeRay operator to pick up the RayCluster"
  return hs
end

local suspended = condition("RayClusterSuspended")
local suspending = condition("RayClusterSuspending")
if (suspended ~= nil and suspended.status == "True") or st.state == "suspended" then
  hs.status = "Suspended"
  hs.message = "RayCluster is suspended: all Ray Pods are deleted"
  return hs
end
if suspend or (suspending ~= nil and suspending.status == "True") then
  hs.status = "Suspended"
  hs.message = "RayCluster is suspending: deleting its Pods"
  return hs
end

-- KubeRay could not create or delete Pods (quota, admission webhook, bad template): it will keep
-- retrying, but nothing changes without a fix.
local failure = condition("ReplicaFailure")
if failure ~= nil and failure.status == "True" then
  hs.status = "Degraded"
  hs.message = "RayCluster cannot manage its Pods: " .. said(failure, "ReplicaFailure")
  return hs
end
if st.state == "failed" then
  hs.status = "Degraded"
  hs.message = "RayCluster failed" .. ((st.reason ~= nil and st.reason ~= "") and (": " .. st.reason) or "")
  return hs
end

local provisioned = condition("RayClusterProvisioned")
local head = condition("HeadPodReady")
if provisioned ~= nil and head ~= nil then
  if provisioned.status ~= "True" then
    hs.status = "Progressing"
    hs.message = "Waiting for all Ray Pods to be ready: " .. said(provisioned, "not provisioned")
    return hs
  end
  -- Provisioned once, head not ready now: the head Pod restarted or was evicted; every Ray job on
  -- the cluster lost its driver (the GCS restarts empty without GCS fault tolerance).
  if head.status ~= "True" then
    hs.status = "Degraded"
    hs.message = "Head Pod is not ready after the cluster was provisioned: " .. said(head, "HeadPodNotReady")
    return hs
  end
  hs.status = "Healthy"
  hs.message = "RayCluster is ready: " .. tostring(st.readyWorkerReplicas or 0) .. "/" ..
    tostring(st.desiredWorkerReplicas or 0) .. " workers ready"
  return hs
end

-- Operator with the RayClusterStatusConditions feature gate off.
if st.state == "ready" then
  hs.status = "Healthy"
  hs.message = "RayCluster is ready (state only; conditions are off)"
  return hs
end
hs.status = "Progressing"
hs.message = "Waiting for the RayCluster to be ready"
return hs
