module github.com/amesh-dev/amesh/ztunnel

go 1.26.0

require github.com/amesh-dev/amesh/api v0.0.0

replace github.com/amesh-dev/amesh/api => ../api
