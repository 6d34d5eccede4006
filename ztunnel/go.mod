module github.com/amesh-dev/amesh/ztunnel

go 1.26.0

require (
	github.com/amesh-dev/amesh/api v0.0.0
	github.com/spiffe/go-spiffe/v2 v2.9.0
)

require (
	golang.org/x/sys v0.49.0
	google.golang.org/protobuf v1.36.12
)

replace github.com/amesh-dev/amesh/api => ../api
