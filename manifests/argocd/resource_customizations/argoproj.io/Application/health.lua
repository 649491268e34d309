-- Argo CD health of a child Application, for the app of apps (root.yaml). Argo CD 1.8 dropped the
-- built-in one (docs: operator-manual/upgrading/1.7-1.8), and without it the parent's sync waves do not wait for the
-- KubeRay operator to be up before syncing dolly-train.
local hs = {}
if obj.status ~= nil and obj.status.health ~= nil and obj.status.health.status ~= nil then
  hs.status = obj.status.health.status
  hs.message = obj.status.health.message or ""
  return hs
end
hs.status = "Progressing"
hs.message = "Waiting for the Application to report its health"
return hs
