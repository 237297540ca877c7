"""Publishes like Dragonflow's ZMQ multiproc publisher agent: a PUSH socket
connected to the publisher service's ipc socket, sending
[topic, msgpack(update.to_dict())].

Usage: dragonflow_multiproc_publisher.py ipc://PATH
Sends probe updates until a line arrives on stdin, then three updates.
"""
import select
import sys
import time

import msgpack
import zmq


def to_dict(table, key, action, value, topic):
    # DbUpdate.to_dict(): exactly these five keys
    return {"table": table, "key": key, "action": action, "value": value, "topic": topic}


def send_event(socket, update, topic=None):
    # PublisherApi.send_event: the topic argument overrides update['topic']
    if topic:
        update["topic"] = topic
    topic = update["topic"] or "D"
    socket.send_multipart([topic.encode("utf-8"), msgpack.packb(update, use_bin_type=True)])


def main():
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(sys.argv[1])
    n = 0
    while not select.select([sys.stdin], [], [], 0.1)[0]:
        n += 1
        send_event(push, to_dict("probe", str(n), "log", None, "D"))
    sys.stdin.readline()
    send_event(push, to_dict("lport", "p1", "create", '{"id": "p1"}', "D"), topic="tenant1")
    send_event(push, to_dict("lport", "p1", "set", '{"id": "p1", "up": true}', "tenant1"))
    send_event(push, to_dict("lport", "p1", "delete", None, "D"))
    push.close(linger=2000)


if __name__ == "__main__":
    main()
