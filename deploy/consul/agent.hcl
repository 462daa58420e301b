# Consul agent for the compose stack: one server, also the local agent every pdmesh service
# registers with (CONSUL_HTTP_ADDR=consul:8500). A real cluster runs three servers and a client
# agent per host; pdmesh needs nothing beyond the HTTP API of the local agent.
datacenter     = "dc1"
data_dir       = "/consul/data"
server         = true
bootstrap_expect = 1
client_addr    = "0.0.0.0"
ui             = true  # 1.8's spelling; newer agents still accept it (ui_config came in 1.9)
ports {
  grpc = -1  # xDS for Envoy: pdmesh does not use Connect sidecars
  dns  = 8600
}
# pdmesh instances register (and deregister) themselves over the HTTP API; the definitions in
# services.hcl are for the parts that do not: the trace and metrics backends.
