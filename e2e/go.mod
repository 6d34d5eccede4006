module github.com/amesh-dev/amesh/e2e

go 1.26.0

require github.com/amesh-dev/amesh/api v0.0.0

replace github.com/amesh-dev/amesh/api => ../api
