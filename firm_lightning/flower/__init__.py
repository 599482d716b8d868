"""The federation on Flower: the same round engine and client fit as in-process, carried by
Flower's simulation engine or by a SuperLink with one SuperNode per client.

| module             | what |
|--------------------|------|
| settings           | the ``flower:`` section: transport only (engine, SecAgg+, resources, timeout) |
| client_app         | ``ClientApp``: ``fit_client`` behind Flower messages |
| client_state       | a stateful client's optimiser state on its own disk |
| strategy           | ``FIRMStrategy``: a Flower Message API strategy that drives the ``RoundEngine`` |
| server_app         | ``ServerApp``: discover the clients, build the engine, start the strategy |
| secure_aggregation | SecAgg+ (Flower's legacy workflow) driving the same engine |
| records            | adapters and uploads as Flower records |
| accounting         | message sizes as Flower counts them |
| partition          | a node's own prompts (shared data set, or its own file) |
| processes    | child processes and their guaranteed teardown |
| simulation   | the simulation engine entry point (a child process) |
| launch       | the ``flower`` command: simulation, local deployment, deployment |
"""
