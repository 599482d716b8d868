"""The federation on Flower: the same client procedure, aggregators and records, run by
Flower's simulation engine or by a SuperLink with one SuperNode per client.

| module       | what |
|--------------|------|
| settings     | the ``flower:`` config section (engine, algorithm, privacy) |
| components   | both apps build module, data and settings from the same YAML as ``fit`` |
| client_app   | ``ClientApp``: the client procedure behind Flower messages |
| strategy     | ``FIRMStrategy``: Flower Message API strategy around the aggregators |
| server_app   | ``ServerApp``: ``Strategy.start`` + evaluation and records like ``fit`` |
| records      | adapters and uploads as Flower records |
| accounting   | message sizes as Flower counts them |
| privacy      | Flower's DP wrappers and SecAgg+, chosen by config |
| partition    | a node's own prompts (shared data set, or its own file) |
| processes    | child processes and their guaranteed teardown |
| simulation   | the simulation engine entry point (a child process) |
| launch       | the ``flower`` command: simulation, local deployment, deployment |
"""
