"""A subscriber that decodes exactly as Dragonflow's ZMQ subscriber agent:
recv_multipart -> [topic, data] -> msgpack unpack -> the five keys.

Usage: dragonflow_subscriber.py ENDPOINT [TOPIC...]
Subscribes to 'D' (SEND_ALL_TOPIC) plus the given topics and prints one
JSON object per update, with the Python type of `value` for the test.
"""
import json
import sys

import msgpack
import zmq


def main():
    endpoint, topics = sys.argv[1], sys.argv[2:]
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(endpoint)
    for topic in ["D"] + topics:
        sub.setsockopt(zmq.SUBSCRIBE, topic.encode("utf-8"))
    print("ready", flush=True)
    while True:
        message = sub.recv_multipart()
        # Dragonflow's agent: a frame count other than two is an error.
        assert len(message) == 2, "expected [topic, data], got %d frames" % len(message)
        data = msgpack.unpackb(message[1], raw=False)
        update = {k: data[k] for k in ("table", "key", "action", "value", "topic")}
        update["value_type"] = type(data["value"]).__name__
        print(json.dumps(update, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
