"""easgate's replay check as a mitmproxy script: re-decide captured flows and compare.

    mitmdump -n -r CAPTURE -s addons/replay.py --set server=false --set easgate_config=CONFIG --set easgate_replay=true

The same gateway addons as addons/gateway.py, with the replay check in front of them; the
production chain (addons/gateway.py, `easgate run`) never carries it.
"""

from easgate.tools.replay import replay_addons

addons = replay_addons()
