// Metal.h — stub of exactly the Metal API subset csrc/metal/*.mm uses, for the Linux
// syntax check (tools/metal_check/check.py check_host) against GNUstep Foundation.
// Declarations follow Apple's Metal framework headers (macOS 14 SDK): names, argument
// labels and types, so a misspelt selector, a wrong argument type or a missing argument
// fails the check. Add a declaration here when the host starts using a new API.
#pragma once
#import <Foundation/Foundation.h>
#include <stdint.h>

typedef double CFTimeInterval;  // CoreFoundation, which GNUstep does not provide
typedef struct { NSUInteger width, height, depth; } MTLSize;
static inline MTLSize MTLSizeMake(NSUInteger w, NSUInteger h, NSUInteger d) { MTLSize s = {w, h, d}; return s; }

typedef NS_ENUM(NSInteger, MTLGPUFamily) {
    MTLGPUFamilyApple7 = 1007,
    MTLGPUFamilyApple8 = 1008,
    MTLGPUFamilyApple9 = 1009,
};
typedef NS_ENUM(NSUInteger, MTLLanguageVersion) { MTLLanguageVersion3_0 = (3 << 16), MTLLanguageVersion3_1 = (3 << 16) + 1 };
typedef NS_OPTIONS(NSUInteger, MTLResourceOptions) { MTLResourceStorageModeShared = 0 };
typedef NS_ENUM(NSUInteger, MTLStorageMode) { MTLStorageModeShared = 0, MTLStorageModePrivate = 2 };
typedef NS_OPTIONS(NSUInteger, MTLPipelineOption) {
    MTLPipelineOptionNone = 0,
    MTLPipelineOptionFailOnBinaryArchiveMiss = 1 << 2,
};
typedef NS_ENUM(NSUInteger, MTLDataType) {
    MTLDataTypeFloat = 3, MTLDataTypeHalf = 16, MTLDataTypeInt = 29, MTLDataTypeShort = 37,
    MTLDataTypeUShort = 41, MTLDataTypeUInt = 33, MTLDataTypeBool = 53,
};
typedef NS_ENUM(NSUInteger, MTLCommandBufferStatus) {
    MTLCommandBufferStatusNotEnqueued = 0, MTLCommandBufferStatusCompleted = 4, MTLCommandBufferStatusError = 5,
};
typedef NS_ENUM(NSUInteger, MTLCounterSamplingPoint) {
    MTLCounterSamplingPointAtStageBoundary = 0, MTLCounterSamplingPointAtDispatchBoundary = 2,
};
typedef uint64_t MTLTimestamp;
typedef struct { uint64_t timestamp; } MTLCounterResultTimestamp;
extern NSString* const MTLCommonCounterSetTimestamp;
static const NSUInteger MTLCounterDontSample = (NSUInteger)-1;

@protocol MTLBuffer;
@protocol MTLFunction;
@protocol MTLLibrary;
@protocol MTLComputePipelineState;
@protocol MTLCommandQueue;
@protocol MTLBinaryArchive;
@protocol MTLCounterSet;
@protocol MTLCounterSampleBuffer;
@class MTLComputePipelineReflection;

@interface MTLFunctionConstant : NSObject
@property (readonly) NSString* name;
@property (readonly) MTLDataType type;
@property (readonly) NSUInteger index;
@property (readonly) BOOL required;
@end

@interface MTLFunctionConstantValues : NSObject
- (void)setConstantValue:(const void*)value type:(MTLDataType)type withName:(NSString*)name;
@end

@interface MTLCompileOptions : NSObject
@property (readwrite) MTLLanguageVersion languageVersion;
@property (readwrite) BOOL fastMathEnabled;
@end

@interface MTLComputePipelineDescriptor : NSObject
@property (copy) NSString* label;
@property (strong) id<MTLFunction> computeFunction;
@property (copy) NSArray<id<MTLBinaryArchive>>* binaryArchives;
@end

@interface MTLBinaryArchiveDescriptor : NSObject
@property (copy) NSURL* url;
@end

@interface MTLCounterSampleBufferDescriptor : NSObject
@property (strong) id<MTLCounterSet> counterSet;
@property (copy) NSString* label;
@property (readwrite) MTLStorageMode storageMode;
@property (readwrite) NSUInteger sampleCount;
@end

@interface MTLComputePassSampleBufferAttachmentDescriptor : NSObject
@property (strong) id<MTLCounterSampleBuffer> sampleBuffer;
@property (readwrite) NSUInteger startOfEncoderSampleIndex;
@property (readwrite) NSUInteger endOfEncoderSampleIndex;
@end

@interface MTLComputePassSampleBufferAttachmentDescriptorArray : NSObject
- (MTLComputePassSampleBufferAttachmentDescriptor*)objectAtIndexedSubscript:(NSUInteger)index;
@end

@interface MTLComputePassDescriptor : NSObject
+ (MTLComputePassDescriptor*)computePassDescriptor;
@property (readonly) MTLComputePassSampleBufferAttachmentDescriptorArray* sampleBufferAttachments;
@end

@protocol MTLCounterSet <NSObject>
@property (readonly) NSString* name;
@end

@protocol MTLCounterSampleBuffer <NSObject>
- (NSData*)resolveCounterRange:(NSRange)range;
@end

@protocol MTLBuffer <NSObject>
- (void*)contents;
@property (readonly) NSUInteger length;
@property (readonly) uint64_t gpuAddress;
@end

@protocol MTLFunction <NSObject>
@property (readonly) NSString* name;
@property (readonly) NSDictionary<NSString*, MTLFunctionConstant*>* functionConstantsDictionary;
@end

@protocol MTLLibrary <NSObject>
- (id<MTLFunction>)newFunctionWithName:(NSString*)functionName
                        constantValues:(MTLFunctionConstantValues*)constantValues
                                 error:(NSError**)error;
@property (readonly) NSArray<NSString*>* functionNames;
@end

@protocol MTLComputePipelineState <NSObject>
@property (readonly) NSUInteger maxTotalThreadsPerThreadgroup;
@property (readonly) NSUInteger threadExecutionWidth;
@property (readonly) NSUInteger staticThreadgroupMemoryLength;
@end

@protocol MTLBinaryArchive <NSObject>
- (BOOL)addComputePipelineFunctionsWithDescriptor:(MTLComputePipelineDescriptor*)descriptor error:(NSError**)error;
- (BOOL)serializeToURL:(NSURL*)url error:(NSError**)error;
@end

@protocol MTLCommandEncoder <NSObject>
- (void)endEncoding;
@end

@protocol MTLComputeCommandEncoder <MTLCommandEncoder>
- (void)setComputePipelineState:(id<MTLComputePipelineState>)state;
- (void)setBuffer:(id<MTLBuffer>)buffer offset:(NSUInteger)offset atIndex:(NSUInteger)index;
- (void)setBytes:(const void*)bytes length:(NSUInteger)length atIndex:(NSUInteger)index;
- (void)setThreadgroupMemoryLength:(NSUInteger)length atIndex:(NSUInteger)index;
- (void)dispatchThreadgroups:(MTLSize)threadgroupsPerGrid threadsPerThreadgroup:(MTLSize)threadsPerThreadgroup;
@end

@protocol MTLBlitCommandEncoder <MTLCommandEncoder>
- (void)fillBuffer:(id<MTLBuffer>)buffer range:(NSRange)range value:(uint8_t)value;
@end

@protocol MTLCommandBuffer <NSObject>
- (id<MTLComputeCommandEncoder>)computeCommandEncoder;
- (id<MTLComputeCommandEncoder>)computeCommandEncoderWithDescriptor:(MTLComputePassDescriptor*)descriptor;
- (id<MTLBlitCommandEncoder>)blitCommandEncoder;
- (void)commit;
- (void)waitUntilCompleted;
@property (readonly) CFTimeInterval GPUStartTime;
@property (readonly) CFTimeInterval GPUEndTime;
@property (readonly) MTLCommandBufferStatus status;
@property (readonly) NSError* error;
@end

@protocol MTLCommandQueue <NSObject>
- (id<MTLCommandBuffer>)commandBuffer;
@end

@protocol MTLDevice <NSObject>
@property (readonly) NSString* name;
@property (readonly) NSUInteger maxThreadgroupMemoryLength;
@property (readonly) MTLSize maxThreadsPerThreadgroup;
@property (readonly) uint64_t recommendedMaxWorkingSetSize;
@property (readonly) NSUInteger currentAllocatedSize;
@property (readonly) NSArray<id<MTLCounterSet>>* counterSets;
- (BOOL)supportsFamily:(MTLGPUFamily)gpuFamily;
- (BOOL)supportsCounterSampling:(MTLCounterSamplingPoint)samplingPoint;
- (id<MTLCommandQueue>)newCommandQueue;
- (id<MTLLibrary>)newLibraryWithURL:(NSURL*)url error:(NSError**)error;
- (id<MTLLibrary>)newLibraryWithSource:(NSString*)source options:(MTLCompileOptions*)options error:(NSError**)error;
- (id<MTLComputePipelineState>)newComputePipelineStateWithDescriptor:(MTLComputePipelineDescriptor*)descriptor
                                                             options:(MTLPipelineOption)options
                                                          reflection:(MTLComputePipelineReflection* __autoreleasing*)reflection
                                                               error:(NSError**)error;
- (id<MTLBuffer>)newBufferWithLength:(NSUInteger)length options:(MTLResourceOptions)options;
- (id<MTLBinaryArchive>)newBinaryArchiveWithDescriptor:(MTLBinaryArchiveDescriptor*)descriptor error:(NSError**)error;
- (id<MTLCounterSampleBuffer>)newCounterSampleBufferWithDescriptor:(MTLCounterSampleBufferDescriptor*)descriptor
                                                              error:(NSError**)error;
- (void)sampleTimestamps:(MTLTimestamp*)cpuTimestamp gpuTimestamp:(MTLTimestamp*)gpuTimestamp;
@end

id<MTLDevice> MTLCreateSystemDefaultDevice(void);
