-- Argo CD health of a Gristmill Script, Flow or WorkerGroup, from its Ready condition.
-- Without it Argo CD calls a custom resource Healthy the moment it exists. Add it to
-- argocd-cm for each kind (see the chart's README section in the project README):
--   resource.customizations.health.gristmill.io_Script: |  <this file>
--   resource.customizations.health.gristmill.io_Flow: |    <this file>
--   resource.customizations.health.gristmill.io_WorkerGroup: |  <this file>
local hs = {status = "Progressing", message = "waiting for the operator"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local generation = obj.metadata.generation
for _, condition in ipairs(obj.status.conditions) do
  if condition.type == "Ready" then
    if generation ~= nil and condition.observedGeneration ~= nil
        and condition.observedGeneration < generation then
      hs.message = "the operator has not seen the latest spec yet"
      return hs
    end
    hs.message = condition.message or condition.reason or ""
    if condition.status == "True" then
      hs.status = "Healthy"
    elseif condition.reason == "MissingReference" then
      hs.status = "Progressing"  -- a Flow waiting for a Script that is on its way
    else
      hs.status = "Degraded"
    end
    return hs
  end
end
return hs
