module github.com/amesh-dev/amesh/waypoint

go 1.26.0

require (
	github.com/amesh-dev/amesh/api v0.0.0
	google.golang.org/protobuf v1.36.12
)

require github.com/go-jose/go-jose/v4 v4.1.9

replace github.com/amesh-dev/amesh/api => ../api
