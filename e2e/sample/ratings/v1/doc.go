// Package ratingsv1 is the gRPC API of the sample application's ratings
// service (generated from ratings.proto).
package ratingsv1
