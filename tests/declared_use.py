"""The use the tests declare with their jobs and read-through calls: every one must declare one
for the licence policy, and the demo teacher's Apache-2.0 licence allows it unconditionally."""

from logitcache.client.client import use_message
from logitcache.client.use import Use

USE = Use("research", "test-student", "test", "tests")
MESSAGE = use_message(USE)  # the UseDeclaration of raw gRPC requests
