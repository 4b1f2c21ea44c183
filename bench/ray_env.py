"""Ray's environment for the benches; import this before ray.

Ray reads these when it is imported and when it starts: loopback only, token auth with a
random token of this run, and every Ray file (sockets, logs, session) in our own directory.
"""

import os
import secrets
import tempfile

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="trb-ray-")
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# The benches' task types (bench.handlers) are the deployment's: Ray workers inherit this.
os.environ.setdefault("TASKRAY_TASK_MODULES", "bench.handlers")
