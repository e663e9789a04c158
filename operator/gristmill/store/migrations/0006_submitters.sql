-- Who started a flow run (the authenticated username), so an approval gate can refuse
-- the run's own submitter (suspend.forbidSubmitter). NULL for runs made before this
-- migration and for runs started by the system (schedules); a gate that forbids the
-- submitter treats an unknown submitter as nobody.
ALTER TABLE flow_runs ADD COLUMN submitted_by text;
