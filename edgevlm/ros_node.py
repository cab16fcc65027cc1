"""The ROS 2 node (rclpy): answers questions about a camera topic's latest frame.

    ros2 run edgevlm_ros node --ros-args -p bundle:=/path/to/bundle -p image_topic:=/camera/image_raw
    ros2 launch edgevlm_ros edgevlm.launch.py params:=edgevlm.yaml

Subscribes to `image_topic` (sensor_msgs/Image, or CompressedImage with `compressed`); answers
  - the service `~/ask` (edgevlm_interfaces/srv/Ask: question, choices -> ok, answer, error, record_json), where
    that interface package is built in the workspace;
  - questions published on `~/question` (std_msgs/String), each answer published on `~/answer` (std_msgs/String
    holding edgevlm.ros.record's JSON: the answer and the whole Extract->Think record);
  - topic mode: `question` asked every `period_s` about the latest new frame, answered on `~/answer`;
and publishes each answer's per-stage timings on /diagnostics (diagnostic_msgs/DiagnosticArray).

Thin by design: parameters, frames, questions, records and diagnostics are edgevlm.ros.NodeCore's (tested without
ROS); this module only moves messages. rclpy is imported when the node starts, so edgevlm needs no ROS install.
"""

from __future__ import annotations

import json
import sys

from edgevlm.errors import EdgeVLMError, first_line
from edgevlm.ros import PARAMETERS, NodeConfig, NodeCore, diagnostics, record
from edgevlm.runner import Runner


class EdgeVLMNode:
    """The rclpy node around a NodeCore."""

    def __init__(self, node_name: str = "edgevlm"):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rcl_interfaces.msg import ParameterDescriptor
        from rclpy.callback_groups import ReentrantCallbackGroup
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage, Image
        from std_msgs.msg import String

        self.node = rclpy.create_node(node_name)
        for name, (default, description) in PARAMETERS.items():
            self.node.declare_parameter(name, default, ParameterDescriptor(description=description))
        config = NodeConfig.of({name: self.node.get_parameter(name).value for name in PARAMETERS})
        self.node.get_logger().info(f"loading {config['bundle'] or config['preset']}")
        self.runner = Runner(config.source().load(), max_queue=max(config["max_queue"], 1))
        self.core = NodeCore(self.runner, config)
        group = ReentrantCallbackGroup()  # a service call waits for its answer while frames keep coming
        self._string = String
        self.answers = self.node.create_publisher(String, "~/answer", 10)
        self.diagnostics = self.node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        kind = CompressedImage if config["compressed"] else Image
        self.node.create_subscription(kind, config["image_topic"], self.core.on_image, qos_profile_sensor_data,
                                      callback_group=group)
        self.node.create_subscription(String, "~/question", self._on_question, 10, callback_group=group)
        if config["question"]:
            self.node.create_timer(config["period_s"], self._on_tick, callback_group=group)
        try:
            from edgevlm_interfaces.srv import Ask
        except ImportError:
            self.node.get_logger().warn("edgevlm_interfaces is not built: no ~/ask service (topics still work)")
        else:
            self.node.create_service(Ask, "~/ask", self._on_ask, callback_group=group)

    def _on_question(self, msg) -> None:
        try:
            request = self.core.ask(msg.data)
        except EdgeVLMError as e:
            self._publish(record(msg.data, error=e), None)
            return
        request.future.add_done_callback(lambda future: self._finished(msg.data, future))

    def _on_tick(self) -> None:
        try:
            request = self.core.tick()
        except EdgeVLMError as e:
            self.node.get_logger().warn(first_line(e), throttle_duration_sec=10.0)
            return
        if request is not None:
            question = self.core.config["question"]
            request.future.add_done_callback(lambda future: self._finished(question, future))

    def _on_ask(self, request, response):
        answer, result = self.core.answer(request.question, list(request.choices))
        response.ok, response.answer, response.error = answer["ok"], answer["answer"], answer["error"]
        response.record_json = json.dumps(answer, ensure_ascii=False)
        if result is not None:
            self._diagnose(result)
        return response

    def _finished(self, question: str, future) -> None:
        """A request's end, on the runner's thread: its record on ~/answer, its timings on /diagnostics."""
        if future.cancelled():
            return
        error = future.exception()
        result = None if error is not None else future.result()
        self._publish(record(question, result, error), result)

    def _publish(self, answer: dict, result) -> None:
        self.answers.publish(self._string(data=json.dumps(answer, ensure_ascii=False)))
        if result is not None:
            self._diagnose(result)

    def _diagnose(self, result) -> None:
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

        array = DiagnosticArray()
        array.header.stamp = self.node.get_clock().now().to_msg()
        for status in diagnostics(result):
            array.status.append(DiagnosticStatus(
                level=getattr(DiagnosticStatus, status["level"]), name=status["name"], message=status["message"],
                hardware_id="edgevlm", values=[KeyValue(key=k, value=v) for k, v in status["values"].items()]))
        self.diagnostics.publish(array)

    def close(self) -> None:
        self.runner.close()
        self.node.destroy_node()


def main(args: list[str] | None = None) -> None:
    """`ros2 run edgevlm_ros node`: spin until shut down; a bad parameter or bundle is one line and exit 2/1."""
    try:
        import rclpy
        from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
    except ImportError as e:
        sys.exit(f"edgevlm: the ROS 2 node needs rclpy (source a ROS 2 install): {e}")
    rclpy.init(args=args)
    try:
        node = EdgeVLMNode()
    except EdgeVLMError as e:
        rclpy.try_shutdown()
        sys.exit(f"edgevlm: {first_line(e)}")
    executor = MultiThreadedExecutor()
    executor.add_node(node.node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.close()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
