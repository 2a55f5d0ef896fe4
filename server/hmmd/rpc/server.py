"""Assemble the gRPC server: services, health, reflection, limits and keepalive."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hmm import bulk
from hmm.channel import bind, grpc_options
from hmm.security import RequireToken, server_credentials
from hmm.status import add_service
from hmm.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc, process_pb2, process_pb2_grpc
from hmmd.config import Config
from hmmd.core.faults import parse_fault_spec
from hmmd.core.kernel import Kernel, KernelLimits
from hmmd.metrics import Metrics
from hmmd.rpc.admin import AdminServicer
from hmmd.rpc.device import DeviceServicer
from hmmd.rpc.process import ProcessServicer
from hmmd.rpc.shm_socket import StagingSocket
from hmmd.rpc.staging import StagingArea

SERVICE_NAMES = (
    process_pb2.DESCRIPTOR.services_by_name["Process"].full_name,
    device_pb2.DESCRIPTOR.services_by_name["Device"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)



class Daemon:
    """The running daemon: kernel + server. ``start`` binds; ``stop`` ends sessions first."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.kernel = Kernel(
            config.ram_bytes,
            KernelLimits(config.max_pages_per_request, config.max_notifiers_per_device, config.max_message_bytes,
                         config.page_lock_timeout_ms / 1000, config.migration_timeout_ms / 1000),
            config.hugetlb_pages,
            config.coherent_bytes,
            config.swap_bytes,
            oom_killer=config.oom_killer == "on",
        )
        self.kernel.trace.set_capacity(config.trace_buffer)
        self.metrics = Metrics(self.kernel) if config.metrics_listen else None
        self.metrics_address = ""
        token = config.token
        self.auth = RequireToken(token) if token else None
        self.server = grpc.aio.server(options=grpc_options(config.max_message_bytes, config.keepalive_ms),
                                      interceptors=[self.auth] if self.auth else None)
        self.kernel.fault_plans = parse_fault_spec(config.inject_faults)
        self.devices = DeviceServicer(self.kernel, config)
        add_service(process_pb2_grpc.add_ProcessServicer_to_server, ProcessServicer(self.kernel), self.server)
        add_service(device_pb2_grpc.add_DeviceServicer_to_server, self.devices, self.server,
                     bulk.server_handlers)  # page contents moved by hmm.bulk
        add_service(admin_pb2_grpc.add_AdminServicer_to_server, AdminServicer(self.kernel, self.devices.sessions),
                     self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.address = ""
        self.shm_socket = StagingSocket(config.shm_socket, self._staging_of) if config.shm_socket else None

    def _staging_of(self, token: str) -> StagingArea | None:
        session = self.devices.sessions.get(token)
        return session.staging if session is not None else None

    async def start(self) -> str:
        c = self.config
        tls = server_credentials(c.tls_cert, c.tls_key, c.tls_client_ca) if c.tls_cert else None
        self.address = bind(self.server, c.listen, tls)
        if self.shm_socket is not None:
            self.shm_socket.start()
        await self.server.start()
        if self.metrics is not None:
            self.metrics_address = await self.metrics.serve(self.config.metrics_listen)
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.address

    async def stop(self, grace: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        if self.metrics is not None:
            self.metrics.serving = False  # /healthz as the gRPC health service
        # Idle streams would hold stop() for the whole grace: end the sessions first.
        await self.devices.close_all()
        self.kernel.trace.close()  # live trace streams, likewise
        if self.metrics is not None:
            await self.metrics.close()
        if self.shm_socket is not None:
            await self.shm_socket.close()
        await self.server.stop(grace)
