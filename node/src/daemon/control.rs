//! The daemon's control API: the gRPC types, server and client generated from
//! `node/proto/control.proto` (package `shoal.control.v1`). The service is implemented in
//! the `daemon` module; the `shoal job` commands use the client.

#![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]

tonic::include_proto!("shoal.control.v1");
