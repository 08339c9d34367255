"""KServe V2 (Open Inference Protocol) over HTTP/REST: routes and the JSON/binary codec."""
